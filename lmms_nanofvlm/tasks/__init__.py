# lmms-eval also reads a plugin's tasks package (task yamls may go here; none are needed: --include_path works)
