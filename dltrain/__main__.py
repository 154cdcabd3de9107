from dltrain.cli import run

run()
