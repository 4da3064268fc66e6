"""The data part: from Kaggle (or a zip, a folder, built-in synthetic cars) to one uint8 array.

    download.py     the Kaggle archive or any zip into data/raw/, in the archive's layout
    folder.py       which files under a folder are the images (data/raw or your own folder)
    synthetic.py    built-in synthetic cars in the same layout (the demo, the tests)
    annotations.py  the devkit's bounding boxes
    preprocess.py   decoding every image once to N x 3 x S x S uint8 + manifest.json
    processed.py    reading that folder back (train, reference, generate)
    formats.py      which file names are images

May import: the top-level modules (config, atomic), numpy, Pillow, scipy (the
devkit's .mat files); kaggle and requests only inside the download functions.
Never torch, the model, training or tracking. This file imports nothing, so a
stage that uses one of these modules depends on that module alone.
"""
