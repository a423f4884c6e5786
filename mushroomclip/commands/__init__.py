"""The command-line programs: each module's main(argv) is one subcommand of the mushroomclip console script."""
