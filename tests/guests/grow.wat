;; Grows its memory by 16 pages (1 MiB) at a time, forever, touching each new page.
(module
  (memory 1)
  (func (export "_start")
    (local $pages i32)
    (loop $l
      (local.set $pages (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $pages) (i32.const -1)) (then unreachable))
      (i32.store (i32.mul (local.get $pages) (i32.const 65536)) (i32.const 1))
      (br $l))))
