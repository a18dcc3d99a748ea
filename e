/dev/fd/3: line 54: ./depcache: No such file or directory
