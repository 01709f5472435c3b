"""The control plane under the reserved prefix (default /__flags): Starlette handlers by topic."""
