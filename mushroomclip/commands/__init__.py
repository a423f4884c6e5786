"""Each command's ``main(argv) -> int``; the top-level scripts and the ``mushroomclip`` console script call them."""
