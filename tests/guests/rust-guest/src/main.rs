//! One guest, many behaviours, chosen by argv[1]; the tests check what each prints or does.
use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cmd = args.get(1).map(String::as_str).unwrap_or("hello");
    let rest = &args[args.len().min(2)..];
    match cmd {
        "hello" => println!("hello from wasm"),
        // Prints every argument, argv[0] included, one per line.
        "args" => {
            for a in &args {
                println!("{a}");
            }
        }
        "env" => {
            let mut vars: Vec<(String, String)> = std::env::vars().collect();
            vars.sort();
            for (k, v) in vars {
                println!("{k}={v}");
            }
        }
        "cat" => {
            for path in rest {
                let s = std::fs::read_to_string(path).unwrap_or_else(|e| {
                    eprintln!("cat {path}: {e}");
                    std::process::exit(2)
                });
                print!("{s}");
            }
        }
        "write" => {
            if let Err(e) = std::fs::write(&rest[0], rest[1].as_bytes()) {
                eprintln!("write {}: {e}", rest[0]);
                std::process::exit(3);
            }
        }
        "ls" => {
            let mut names: Vec<String> = std::fs::read_dir(&rest[0])
                .expect("read_dir")
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                println!("{n}");
            }
        }
        "stdin" => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).unwrap();
            print!("{}", s.to_uppercase());
        }
        "streams" => {
            println!("to stdout");
            eprintln!("to stderr");
            std::io::stdout().flush().unwrap();
        }
        "exit" => std::process::exit(rest[0].parse().unwrap()),
        "panic" => panic!("guest panicked on purpose"),
        // Allocates and touches N MiB, one MiB at a time.
        "alloc" => {
            let mib: usize = rest[0].parse().unwrap();
            let mut keep = Vec::new();
            for i in 0..mib {
                keep.push(vec![i as u8; 1 << 20]);
            }
            println!("allocated {} MiB", keep.len());
        }
        "loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "sleep" => std::thread::sleep(std::time::Duration::from_millis(rest[0].parse().unwrap())),
        other => {
            eprintln!("unknown command {other}");
            std::process::exit(64);
        }
    }
}
