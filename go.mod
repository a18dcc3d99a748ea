module github.com/depcache/depcache

go 1.26.8

require (
	github.com/google/renameio/v2 v2.0.2
	github.com/sirupsen/logrus v1.10.2
)

require golang.org/x/sys v0.50.0 // indirect
