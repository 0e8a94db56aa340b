from mrsync.launch import run

run()
