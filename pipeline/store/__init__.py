"""The target store: what extraction writes and stage 2 reads (docs/design.md, "The target store on disk").

- `layout`: the folders, file names and table schemas of a store, and its errors
- `provenance`: store.json, what a store was made from, and whether a job or a run matches it
- `parts`: a shard's commit from the teacher actors' output rows (latents in Ray's object store)
- `write`: a shard committed whole (encoded in memory, each file written once, the marker last), the store-level tables
- `read`: `TargetStore`, the read side (the store-level tables for the shards they still describe), and the summary `make inspect` prints
- `verify`: every file and row re-read (`make inspect VERIFY=1`)
- `pixel_codec`: the pixel cache's codec (one crop box <-> one blob)
"""
