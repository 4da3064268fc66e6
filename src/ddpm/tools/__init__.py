"""Tools outside the pipeline's stages.

    cli.py    the `ddpm` command (summary, sample, fid, bench, demo, tracking replay)
    bench.py  `ddpm bench`: the train stage's step, sampling and FID throughput, timed
              with torch.utils.benchmark
    demo.py   `ddpm demo` / `make demo`: the whole pipeline on synthetic cars

May import anything in the package; nothing in the package imports it.
"""
