module github.com/nbd-csi/nbd-csi

go 1.26

require github.com/google/go-cmp v0.7.0 // indirect
