"""SFT data selection (IFD, InsTag, embedding diversity, Deita): lands with its issue."""
