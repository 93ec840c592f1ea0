"""The pipeline's stages, one module each (`python -m stages.<name>`), on the library floor `stages.lib`."""
