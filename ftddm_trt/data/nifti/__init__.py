"""NIfTI files in the FSL-MRS (``fsl_mrsi``) layout, the only place where ``(Z, ...)`` arrays in memory meet
``(X, Y, Z)`` arrays on disk.

- ``files``: finding and loading NIfTI files, ``InputError`` (every input problem names its file);
- ``resample``: the affines of the acquired and the 64x64 grids, resampling of masks and images onto a grid;
- ``read``: ``read_subject`` (a user's subject, layout in its docstring) and ``read_map_folder``;
- ``write``: ``write_subject``, ``write_maps`` (outputs) and the phantom writers, every file written whole.

Nothing is imported here: import from the module that defines a name.
"""
