//! Compiles upstream's `kbs.plugin.v1` and Tether's `tether.plugin.v1` with protox (pure
//! Rust: the build needs no `protoc`) and generates the tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/kbs/plugin/v1/plugin.proto",
        "proto/tether/plugin/v1/guests.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
