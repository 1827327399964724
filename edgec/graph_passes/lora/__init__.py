"""LoRA passes: fold exported branches (``fold``), merge adapters into weights (``merge``, also
LoSA's sparse merge) and swappable adapters as graph inputs (``swappable``)."""
