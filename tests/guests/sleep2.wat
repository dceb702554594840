;; A WASI preview 1 command that sleeps 2 s (poll_oneoff on the monotonic clock), then returns
;; (exit 0): a Wasm task that is still running when a test kills its agent.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; One subscription at 256: userdata 0, tag 0 (clock), monotonic, 2 s relative.
    (i64.store (i32.const 256) (i64.const 0))
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.const 2000000000))
    (i64.store (i32.const 288) (i64.const 0))
    (i32.store16 (i32.const 296) (i32.const 0))
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))))
