"""The index folder: its owner (IndexFolder: generations, commit, writer lock), manifest, build/add and open."""
