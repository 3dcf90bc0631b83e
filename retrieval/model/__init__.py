"""The network (open_clip image tower -> projection -> unit embedding + heads), its config, runtime and files."""
