"""SFT data selection (IFD, InsTag, embedding diversity, Deita): docs/selection.md."""
