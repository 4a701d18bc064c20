// Embed libtorch's directories as the binary's rpath so it runs with no extra
// environment. torch-sys (links = "tch") exports the directory it linked.
// The CUDA build of libtorch_cpu.so needs libcudart and libcupti, which pip
// installs beside torch under nvidia/*/lib; since libtorch_cpu.so carries no
// runpath of its own, the binary's search path must reach them, which only
// DT_RPATH (not the newer DT_RUNPATH) does for indirect dependencies.
fn main() {
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
    compile_cpp(std::path::Path::new(&lib));
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let nvidia = std::path::Path::new(&lib).join("../../nvidia");
    if let Ok(entries) = std::fs::read_dir(&nvidia) {
        let mut dirs: Vec<_> = entries.flatten().map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
        dirs.sort();
        for dir in dirs {
            let dir = dir.canonicalize().unwrap_or(dir);
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
        }
    }
    if nvidia.is_dir() {
        println!("cargo:rerun-if-changed={}", nvidia.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// `cpp/`, compiled against libtorch's headers as torch-sys compiles its own
/// C++ (C++17, the new libstdc++ ABI the PyPI wheels use). The c10d shim
/// needs Gloo's headers, which the wheel lacks: with Debian's libgloo-dev
/// (or GLOO_INCLUDE) it is built with USE_C10D_GLOO, the macro libtorch
/// itself was built with; without, its calls fail saying what to install.
fn compile_cpp(lib: &std::path::Path) {
    let include = lib.join("../include");
    let gloo = std::env::var("GLOO_INCLUDE").unwrap_or_else(|_| "/usr/include".to_string());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("cpp/addmm.cpp")
        .file("cpp/onednn_linear.cpp")
        .file("cpp/c10d.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false);
    let gloo_config = std::path::Path::new(&gloo).join("gloo/config.h");
    if gloo_config.is_file() {
        // The compiler searches /usr/include already, and after libstdc++'s own headers.
        if gloo != "/usr/include" {
            build.include(&gloo);
        }
        build.define("USE_C10D_GLOO", None);
    } else {
        println!("cargo:warning=Gloo's headers are not installed ({} is missing): a stage with `processes` above 1 will fail; `make setup` as root installs libgloo-dev", gloo_config.display());
    }
    println!("cargo::rustc-check-cfg=cfg(llmflow_nccl)");
    let nccl = gloo_config.is_file() && nccl(lib, &mut build);
    build.compile("llmflow_cpp");
    if nccl {
        // After the static library, which needs them: c10d's NCCL group is in libtorch_cuda.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=llmflow_nccl");
    }
    println!("cargo:rerun-if-changed=cpp");
    println!("cargo:rerun-if-changed={}", gloo_config.display());
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE");
}

/// Adds NCCL's process group to the c10d shim where `make setup CUDA=1`
/// installed the headers it is compiled against beside libtorch: NCCL's
/// (`nvidia/nccl`) and CUDA's with crt and CCCL (`nvidia/cu*`). Without
/// them, the build trains across processes on the CPU only.
fn nccl(lib: &std::path::Path, build: &mut cc::Build) -> bool {
    let nvidia = lib.join("../../nvidia");
    let nccl = nvidia.join("nccl/include");
    let cuda = std::fs::read_dir(&nvidia)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("include"))
        .find(|dir| dir.join("cuda_runtime.h").is_file());
    let Some(cuda) = cuda.filter(|_| nccl.join("nccl.h").is_file()) else { return false };
    if !cuda.join("crt/host_config.h").is_file() || !cuda.join("nv/target").is_file() {
        println!("cargo:warning=NCCL is installed but CUDA's crt and CCCL headers are not ({}): no NCCL process group in this build; `make setup CUDA=1` installs them", cuda.display());
        return false;
    }
    build.include(&cuda).include(&nccl).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
    true
}
