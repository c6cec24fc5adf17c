"""Small file helpers every layer uses: JSON read with one-line errors, safetensors written with the
umask's mode, files replaced atomically (a temporary file renamed onto the target), and image files
(PNG grids)."""
