"""The pipeline's stages, one module each (`python -m stages.<name>`), on the library floor `stages.lib`."""

from stages.lib.allocator import restart_tuned

restart_tuned()  # before any stage imports torch: glibc's malloc tuned for training steps (stages/lib/allocator.py)
