"""Small file helpers every layer uses: JSON read with one-line errors, safetensors written with the
umask's mode, and image files (PNG grids)."""
