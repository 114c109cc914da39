"""python convert.py --hf-path REPO_OR_DIR --mlx-path OUT [-q] [--q-bits 4] ... (see --help)"""

from mlx_lfm2.weights.conversion import main

if __name__ == "__main__":
    main()
