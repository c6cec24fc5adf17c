"""Small file helpers every layer uses: every write atomic with one-line errors for a full disk
(atomic), JSON read with one-line errors, safetensors written with the umask's mode, and image
files (PNG grids)."""
