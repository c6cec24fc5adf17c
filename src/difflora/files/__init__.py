"""Small file helpers every layer uses: every write atomic with one-line errors for a full disk
(atomic), JSON read with one-line errors, safetensors written with the umask's mode, the cache root
(``$DIFFLORA_CACHE``), and image files (PNG grids)."""
