"""What training and serving share: base loading, tokenisation, task heads, LoRA, bundles."""
