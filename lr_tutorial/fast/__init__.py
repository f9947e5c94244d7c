"""The fast engine, LRConfig(engine="fast"): the method of lr_tutorial.pipeline with speed work
that changes its results by float rounding only, each piece tested equal to the reference
engine (tests/test_fast.py). The method modules never import it.

    kv.py        key/value caches: recorded in one run, read by another (pinned host slabs)
    riding.py    the reference inversion riding stage 1's UNet calls
    swap.py      the attention swap on the target rows alone, reading the caches
    stage2.py    stage 2 on the target rows alone; the reference's keys/values replayed
    pipeline.py  FastLayoutAndRetouch: the engine, with the stage-2 path chooser (importing it
                 registers the engine; the package root does)
    lora.py      ModelBundle's kept LoRA merge, per-row LoRA and oneDNN switch
"""
