"""Training of the BEVPlace place-recognition network: cached data, mining, losses, trainer."""
