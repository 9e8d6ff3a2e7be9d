"""The search's defaults, in one module light enough for the CLI to show them in its help
without importing the image stack; :mod:`asset_library.ingest.fingerprint` re-exports them."""

#: pHash distance within which two images count as near-duplicates. On the corpus, re-encodes,
#: resizes and EXIF-rotated copies fall at 0-8 bits; unrelated photos rarely come under 15.
DEFAULT_PHASH_THRESHOLD = 8

#: Search results whose ``quality`` is below this are left out (see :func:`information_score`
#: and :mod:`asset_library.search.quality`). Measured by
#: ``asset_library_tests/test_search_quality.py`` (fast mode): of the 385 photographs of
#: ``asset_library_tests/data/photos.txt`` and their blurred, low-contrast, dark and hazy
#: versions none is below (the lowest at 46; the older step-sum score hid 36 of them, 9.4%), and
#: all 50 generated flat images (one colour, linear and radial gradients, vignettes, near-blank
#: scans) are (the highest at 35; the step-sum score kept full-range gradients at 41 and 74).
#: On the corpus, the 26 one-colour files and 6 smooth gradients are below, 1 of 77 camera
#: JPEGs (a yellow sprite) is, and unrelated results per query stay at 0.25 (0.21 with the
#: dHash confirmation).
DEFAULT_MIN_QUALITY = 40

#: A pHash match is kept only when the two images' dHashes are within this many bits too (see
#: :mod:`asset_library.search.quality`). Two unrelated images' dHashes differ by 32 bits on
#: average (binomial, standard deviation 4: 20 or fewer by chance once in 540 pairs; on the
#: corpus, 1% of the pairs more than 16 pHash bits apart are within 18). The corpus's labelled
#: copies differ by 0-8 bits (13 for a copy with alpha added), the edited copies of
#: ``benchmarks/quality.py`` that pHash finds by at most 9. Any bound from 16 to 24 gives the
#: same results on both; 20 leaves a margin on each side.
DEFAULT_CONFIRM_DISTANCE = 20
