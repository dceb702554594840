;; Traps with `unreachable` one call deep.
(module
  (func $boom unreachable)
  (func (export "_start") (call $boom)))
