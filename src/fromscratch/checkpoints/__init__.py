"""Checkpoint infrastructure every model shares (import the modules you need; this file imports none):

    safe          reading weights and JSON safely (weights_only pickles, float-only weights,
                  JSON objects only) and writing files readable by all
    resolve       what `--checkpoint SPEC` / `from_pretrained(SPEC)` means: a local path, a
                  training run (its best checkpoint, else its latest), or a hub name
    huggingface   Hugging Face model directories: their weight files (single or sharded
                  safetensors or pickles) in, a directory written all at once or not at all out

The formats of each model (Llama's Meta and llama2.c files, Marian, Mixtral, CLIP, ...) live
in that model's package and build on these.
"""
