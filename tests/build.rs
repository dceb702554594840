//! Builds the fake `libnvidia-ml.so.1` (tests/fake-nvml/fake_nvml.c) that the GPU tests load
//! through the real nvml-wrapper path; its location is `env!("FAKE_NVML_LIB")`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "fake-nvml/fake_nvml.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fake-nvml");
    std::fs::create_dir_all(&out).expect("creating the fake NVML output dir");
    let lib = out.join("libnvidia-ml.so.1");
    // cc finds the C compiler for the target; a shared object needs one link step of our own.
    let compiler = cc::Build::new().get_compiler();
    let status = Command::new(compiler.path())
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(src)
        .status()
        .expect("running the C compiler");
    assert!(status.success(), "building the fake libnvidia-ml failed");
    println!("cargo:rustc-env=FAKE_NVML_LIB={}", lib.display());
}
