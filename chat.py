"""python chat.py [--model PATH_OR_REPO] [--system TEXT] [--tools FILE.py] ... (see --help)"""

from mlx_lfm2.cli.chat import main

if __name__ == "__main__":
    main()
