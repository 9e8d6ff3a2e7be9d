"""The search's defaults, in one module light enough for the CLI to show them in its help
without importing the image stack; :mod:`asset_library.ingest.fingerprint` re-exports them."""

#: pHash distance within which two images count as near-duplicates. On the corpus, re-encodes,
#: resizes and EXIF-rotated copies fall at 0-8 bits; unrelated photos rarely come under 15.
DEFAULT_PHASH_THRESHOLD = 8

#: Search results whose ``quality`` is below this are left out (see :func:`information_score`
#: and :mod:`asset_library.search.quality`). Chosen on the corpus, fast mode, and re-measured
#: by ``asset_library_tests/test_search_quality.py``: the lowest camera JPEGs (EXIF make, or
#: from ianare/exif-samples and the Debian packages: 77 files) are a yellow sprite (0), two
#: gradient wallpapers (25, 31), a login-screen screenshot (52), then photos from 70 up. The 26
#: one-colour files score 0 and the 8 smooth gradients 4-31. At 40 all 34 flat files fall below
#: and 3 of the 77 camera JPEGs do (3.9%; the bound was 5%), with room on both sides.
DEFAULT_MIN_QUALITY = 40

#: A pHash match is kept only when the two images' dHashes are within this many bits too (see
#: :mod:`asset_library.search.quality`). Two unrelated images' dHashes differ by 32 bits on
#: average (binomial, standard deviation 4: 20 or fewer by chance once in 540 pairs; on the
#: corpus, 1% of the pairs more than 16 pHash bits apart are within 18). The corpus's labelled
#: copies differ by 0-8 bits (13 for a copy with alpha added), the edited copies of
#: ``benchmarks/quality.py`` that pHash finds by at most 9. Any bound from 16 to 24 gives the
#: same results on both; 20 leaves a margin on each side.
DEFAULT_CONFIRM_DISTANCE = 20
