"""d2v-bulk: embed a whole corpus into Parquet shards, resumably, as a thin front end over the server's core.

`sources` reads the inputs (a folder, a manifest, a text or Parquet file), `engines` embeds batches of them (the
core in-process, or a running server over EmbedStream), `ray_engine` runs the in-process engine inside Ray Data
actors, `job` writes the shards, the manifest and errors.jsonl, and `cli` is the console script.
"""
