// The example in module mode: `go mod tidy` (with access to the Go module proxy)
// fills in grpc and protobuf. The test builds it in GOPATH mode from Debian's
// packages instead, where this file is not read.
module example.com/ingestion-grpc/examples/go

go 1.19

require example.com/ingestion-grpc/gen/go v0.0.0

replace example.com/ingestion-grpc/gen/go => ../../gen/go
