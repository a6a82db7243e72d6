module github.com/nbd-csi/nbd-csi

go 1.26
