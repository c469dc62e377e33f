"""The networks: VAE, U-Net, text encoders, the evaluation classifier, and the layers they share."""
