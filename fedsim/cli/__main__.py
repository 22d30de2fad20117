from fedsim.cli.main import entry

entry()
