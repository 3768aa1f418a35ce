"""One short function per DVC stage: read its params section and upstream meta.json,
call the library, write outputs atomically and the stage's metrics file.

Nothing imports this package except the CLI.
"""
