//! Which NIC serves which GPU.
//!
//! GPUDirect RDMA is fast only when the NIC and the GPU sit under the same PCIe switch;
//! across the root complex the traffic crosses the CPU's interconnect, or the platform
//! refuses peer-to-peer altogether. A machine built for it (eight GPUs, eight NICs)
//! pairs each GPU with the NIC next to it, and so does cuda_gdr, as the original did:
//! each GPU gets the NIC whose PCI device's sysfs path shares the most leading
//! components with the GPU's (`/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/...`
//! names every bridge on the way), ties going to the first NIC by name. A user who
//! knows better names the NICs ([`NicChoice`]).

use std::path::{Path, PathBuf};

/// How cuda_gdr pairs each GPU with an RDMA device.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum NicChoice {
    /// For each GPU, the NIC nearest to it on the PCIe tree (see the module docs).
    #[default]
    Nearest,
    /// Every GPU uses this NIC.
    One(String),
    /// GPU `i` uses the `i`-th NIC: one name per GPU, in CUDA's device order.
    PerGpu(Vec<String>),
}

impl NicChoice {
    /// From the environment: `TP_CUDA_GDR_NICS` (comma-separated names, one per GPU,
    /// or a single name for all of them), else `TP_IBV_DEVICE` (one for all, as the ibv
    /// transport takes it), else [`NicChoice::Nearest`].
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if let Some(list) = env("TP_CUDA_GDR_NICS") {
            return Self::parse(&list);
        }
        env("TP_IBV_DEVICE").map_or(Self::Nearest, |n| Self::One(n.trim().to_string()))
    }

    /// Parses a comma-separated list of NIC names (one name: every GPU uses it).
    pub fn parse(list: &str) -> Self {
        let mut names: Vec<String> = list
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        match names.len() {
            0 => Self::Nearest,
            1 => Self::One(names.remove(0)),
            _ => Self::PerGpu(names),
        }
    }
}

/// The sysfs path of the GPU at PCI `domain:bus:device` (function 0), resolved through
/// its symlinks; `None` where sysfs does not have it (a VM may hide the topology).
pub(crate) fn gpu_path(sysfs: &Path, pci: (i32, i32, i32)) -> Option<PathBuf> {
    let (domain, bus, dev) = pci;
    sysfs
        .join(format!(
            "bus/pci/devices/{domain:04x}:{bus:02x}:{dev:02x}.0"
        ))
        .canonicalize()
        .ok()
}

/// The sysfs path of RDMA device `name`'s PCI device, resolved; `None` where there is
/// none (a software device such as rxe has no PCI parent of its own).
pub(crate) fn nic_path(sysfs: &Path, name: &str) -> Option<PathBuf> {
    sysfs
        .join("class/infiniband")
        .join(name)
        .join("device")
        .canonicalize()
        .ok()
}

/// How many leading components two paths share.
fn shared_components(a: &Path, b: &Path) -> usize {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .count()
}

/// Pairs every GPU with a NIC.
///
/// `gpus` holds each GPU's sysfs path where known; `nics` each RDMA device's name and
/// sysfs path, in the order ties are broken in. Returns, per GPU, an index into `nics`.
///
/// # Errors
/// A named NIC that is not among `nics`, a per-GPU list of the wrong length, or no NICs.
pub(crate) fn assign(
    choice: &NicChoice,
    gpus: &[Option<PathBuf>],
    nics: &[(String, Option<PathBuf>)],
) -> Result<Vec<usize>, String> {
    if nics.is_empty() {
        return Err("no RDMA devices".to_string());
    }
    let index = |name: &str| {
        nics.iter().position(|(n, _)| n == name).ok_or_else(|| {
            let all: Vec<&str> = nics.iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "no RDMA device named {name} (there are: {})",
                all.join(", ")
            )
        })
    };
    match choice {
        NicChoice::One(name) => Ok(vec![index(name)?; gpus.len()]),
        NicChoice::PerGpu(names) if names.len() != gpus.len() => Err(format!(
            "TP_CUDA_GDR_NICS names {} NICs for {} GPUs (give one per GPU, or one for all)",
            names.len(),
            gpus.len()
        )),
        NicChoice::PerGpu(names) => names.iter().map(|n| index(n)).collect(),
        NicChoice::Nearest => Ok(gpus
            .iter()
            .map(|gpu| {
                let Some(gpu) = gpu else { return 0 };
                let mut best = (0, 0);
                for (i, (_, nic)) in nics.iter().enumerate() {
                    let shared = nic.as_deref().map_or(0, |p| shared_components(gpu, p));
                    if shared > best.1 {
                        best = (i, shared);
                    }
                }
                best.0
            })
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake sysfs: two PCIe switches under one root port each, a GPU and a NIC under
    /// each switch, and a NIC with no PCI parent.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "tp-gdr-sysfs-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&root);
            let devices = root.join("devices");
            let pci = [
                // GPU 0 and mlx5_1 under switch A; GPU 1 and mlx5_0 under switch B.
                (
                    "0000:1b:00.0",
                    "pci0000:00/0000:00:01.0/0000:10:00.0/0000:11:00.0/0000:1b:00.0",
                ),
                (
                    "0000:1c:00.0",
                    "pci0000:00/0000:00:01.0/0000:10:00.0/0000:11:04.0/0000:1c:00.0",
                ),
                (
                    "0000:9b:00.0",
                    "pci0000:80/0000:80:01.0/0000:90:00.0/0000:91:00.0/0000:9b:00.0",
                ),
                (
                    "0000:9c:00.0",
                    "pci0000:80/0000:80:01.0/0000:90:00.0/0000:91:04.0/0000:9c:00.0",
                ),
            ];
            std::fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(root.join("class/infiniband")).unwrap();
            for (bdf, path) in pci {
                let dir = devices.join(path);
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::symlink(&dir, root.join("bus/pci/devices").join(bdf)).unwrap();
            }
            for (nic, bdf) in [("mlx5_1", "0000:1c:00.0"), ("mlx5_0", "0000:9c:00.0")] {
                let dir = devices.join("virtual/infiniband").join(nic);
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::symlink(
                    root.join("bus/pci/devices").join(bdf),
                    dir.join("device"),
                )
                .unwrap();
                std::os::unix::fs::symlink(&dir, root.join("class/infiniband").join(nic)).unwrap();
            }
            std::fs::create_dir_all(root.join("class/infiniband/rxe0")).unwrap();
            Self(root)
        }

        fn gpus(&self) -> Vec<Option<PathBuf>> {
            [(0, 0x1b, 0), (0, 0x9b, 0)]
                .into_iter()
                .map(|pci| gpu_path(&self.0, pci))
                .collect()
        }

        fn nics(&self, names: &[&str]) -> Vec<(String, Option<PathBuf>)> {
            names
                .iter()
                .map(|n| (n.to_string(), nic_path(&self.0, n)))
                .collect()
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn each_gpu_gets_the_nic_under_its_own_switch() {
        let sys = FakeSysfs::new();
        let gpus = sys.gpus();
        assert!(gpus.iter().all(Option::is_some), "{gpus:?}");
        let nics = sys.nics(&["mlx5_0", "mlx5_1", "rxe0"]);
        assert!(nics[2].1.is_none(), "rxe0 has no PCI device");
        // GPU 0 (0000:1b) sits beside mlx5_1, GPU 1 (0000:9b) beside mlx5_0.
        assert_eq!(assign(&NicChoice::Nearest, &gpus, &nics), Ok(vec![1, 0]));
        // The order NICs are listed in does not change who is nearest.
        let nics = sys.nics(&["rxe0", "mlx5_1", "mlx5_0"]);
        assert_eq!(assign(&NicChoice::Nearest, &gpus, &nics), Ok(vec![1, 2]));
    }

    #[test]
    fn ties_and_unknown_places_go_to_the_first_nic() {
        let sys = FakeSysfs::new();
        let mut gpus = sys.gpus();
        // Only NICs without a PCI place: nothing is nearer than anything else.
        let nics = sys.nics(&["rxe0", "rxe1"]);
        assert_eq!(assign(&NicChoice::Nearest, &gpus, &nics), Ok(vec![0, 0]));
        // A GPU sysfs does not know (a VM hiding the topology) takes the first NIC.
        gpus[1] = None;
        let nics = sys.nics(&["mlx5_1", "mlx5_0"]);
        assert_eq!(assign(&NicChoice::Nearest, &gpus, &nics), Ok(vec![0, 0]));
        assert_eq!(gpu_path(&sys.0, (0, 0x42, 0)), None);
    }

    #[test]
    fn named_nics_are_taken_as_given_and_checked() {
        let sys = FakeSysfs::new();
        let gpus = sys.gpus();
        let nics = sys.nics(&["mlx5_0", "mlx5_1"]);
        let one = NicChoice::One("mlx5_0".into());
        assert_eq!(assign(&one, &gpus, &nics), Ok(vec![0, 0]));
        let per_gpu = NicChoice::PerGpu(vec!["mlx5_0".into(), "mlx5_1".into()]);
        assert_eq!(assign(&per_gpu, &gpus, &nics), Ok(vec![0, 1]));

        let unknown = NicChoice::One("mlx5_7".into());
        let e = assign(&unknown, &gpus, &nics).unwrap_err();
        assert!(
            e.contains("no RDMA device named mlx5_7") && e.contains("mlx5_1"),
            "{e}"
        );
        let short = NicChoice::PerGpu(vec!["mlx5_0".into(), "mlx5_1".into(), "mlx5_0".into()]);
        let e = assign(&short, &gpus, &nics).unwrap_err();
        assert!(e.contains("3 NICs for 2 GPUs"), "{e}");
        let e = assign(&NicChoice::Nearest, &gpus, &[]).unwrap_err();
        assert_eq!(e, "no RDMA devices");
    }

    #[test]
    fn the_environment_forms_parse() {
        assert_eq!(NicChoice::parse(""), NicChoice::Nearest);
        assert_eq!(NicChoice::parse(" , "), NicChoice::Nearest);
        assert_eq!(NicChoice::parse("mlx5_3"), NicChoice::One("mlx5_3".into()));
        assert_eq!(
            NicChoice::parse("mlx5_0, mlx5_1,mlx5_2"),
            NicChoice::PerGpu(vec!["mlx5_0".into(), "mlx5_1".into(), "mlx5_2".into()])
        );
    }

    #[test]
    fn shared_components_count_whole_components() {
        let a = Path::new("/sys/devices/pci0000:00/0000:00:01.0");
        let b = Path::new("/sys/devices/pci0000:00/0000:00:01.1");
        assert_eq!(shared_components(a, b), 4);
        assert_eq!(shared_components(a, a), 5);
        assert_eq!(shared_components(a, Path::new("relative")), 0);
    }
}
