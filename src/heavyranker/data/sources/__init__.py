"""Where records come from: which files a data config reads (files.py) and how each kind of file is read
(tfrecord.py)."""
