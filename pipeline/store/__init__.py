"""The target store: what extraction writes and stage 2 reads (docs/design.md, "The target store on disk").

- `layout`: the folders, file names and table schemas of a store, and its errors
- `provenance`: store.json, what a store was made from, and whether a job or a run matches it
- `parts`: the teacher actors' part files and a shard's commit from them
- `write`: a shard committed whole, the store-level tables
- `read`: `TargetStore`, the read side, and the summary `make inspect` prints
- `verify`: every file and row re-read (`make inspect VERIFY=1`)
- `pixel_codec`: the pixel cache's codec (one crop box <-> one blob)
"""
