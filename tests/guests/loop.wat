;; Never returns: only epoch interruption stops it.
(module
  (func (export "_start") (loop $l (br $l))))
