module kdispatch/tests/bench/kd-bench-go

go 1.19
