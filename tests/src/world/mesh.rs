//! Identity material and discovery for meshed worlds.
use super::*;

impl World {
    /// `ecsmesh ca ...`; panics with its output when it fails.
    pub fn ca(&self, args: &[&str]) -> String {
        let out = Command::new(&self.tools.ecsmesh)
            .arg("ca")
            .args(args)
            .output()
            .expect("ecsmesh ca");
        assert!(
            out.status.success(),
            "ecsmesh ca {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ecsmesh ca ...` run as an operator on instance `i` (its netns, an unenrolled
    /// cgroup), where it can reach node admin ports on the fabric. Returns the output.
    pub fn ca_on(&self, i: usize, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(&self.tools.ecsmesh);
        cmd.arg("ca").args(args);
        process::place(&mut cmd, &self.instances[i].placement("unenrolled"));
        process::run(cmd)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.workdir.join("ca")
    }

    /// `ca init` for `trust_domain` and an empty discovery file: (CA dir, discovery file).
    fn init_ca(&self, trust_domain: &str) -> (PathBuf, PathBuf) {
        let ca = self.ca_dir();
        self.ca(&[
            "init",
            "--trust-domain",
            trust_domain,
            "--out",
            &ca.display().to_string(),
        ]);
        let discovery = self.workdir.join("discovery.toml");
        std::fs::write(&discovery, "").unwrap();
        (ca, discovery)
    }

    /// A CA for `trust_domain` and one issuer per instance; every proxy started afterwards
    /// runs with mTLS. Discovery starts empty: see `write_discovery`.
    pub fn enable_mesh(&mut self, trust_domain: &str) {
        let (ca, discovery) = self.init_ca(trust_domain);
        for i in 0..self.instances.len() {
            let name = self.instances[i].name.clone();
            let issuer_dir = self.workdir.join(format!("issuer-{name}"));
            self.ca(&[
                "issue-intermediate",
                "--ca",
                &ca.display().to_string(),
                "--instance",
                &name,
                "--out",
                &issuer_dir.display().to_string(),
            ]);
            self.instances[i].mesh = Some(InstanceMesh {
                trust_domain: trust_domain.to_owned(),
                issuer_dir,
                discovery: discovery.clone(),
            });
        }
    }

    /// Issuer mode: a CA, the issuing CA of `ecsmesh issuer` (`issuer_ca_dir`), and per
    /// instance a directory holding only a copy of the trust bundle (what a real node is
    /// given out of band): no CA key on any node. Proxies need `ProxyOptions::issuer`.
    pub fn enable_issuer_mesh(&mut self, trust_domain: &str) {
        let (ca, discovery) = self.init_ca(trust_domain);
        self.ca(&[
            "issue-intermediate",
            "--ca",
            &ca.display().to_string(),
            "--instance",
            "issuer",
            "--out",
            &self.issuer_ca_dir().display().to_string(),
        ]);
        for i in 0..self.instances.len() {
            let dir = self
                .workdir
                .join(format!("node-{}", self.instances[i].name));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(ca.join("bundle.pem"), dir.join("bundle.pem")).unwrap();
            self.instances[i].mesh = Some(InstanceMesh {
                trust_domain: trust_domain.to_owned(),
                issuer_dir: dir,
                discovery: discovery.clone(),
            });
        }
    }

    /// The issuing CA directory of `ecsmesh issuer` (see `enable_issuer_mesh`).
    pub fn issuer_ca_dir(&self) -> PathBuf {
        self.workdir.join("issuer-ca")
    }

    /// Meshed endpoints: (service, address, task family). Tunnel address = endpoint IP.
    pub fn write_discovery(&self, endpoints: &[(&str, SocketAddr, &str)]) {
        let with: Vec<_> = endpoints
            .iter()
            .map(|(s, a, f)| (*s, *a, *f, None))
            .collect();
        self.write_discovery_with_tunnels(&with);
    }

    /// Meshed endpoints with an explicit tunnel address where given: (service, address,
    /// task family, tunnel). Bridge-mode tasks behind a node proxy are reached through the
    /// instance address (`Instance::tunnel_addr`), behind a sidecar through the task
    /// address (`Task::sidecar_tunnel_addr`).
    pub fn write_discovery_with_tunnels(
        &self,
        endpoints: &[(&str, SocketAddr, &str, Option<SocketAddr>)],
    ) {
        let mut t = String::new();
        for (service, addr, family, tunnel) in endpoints {
            t += &format!(
                "[[services]]\nname = \"{service}\"\n[[services.endpoints]]\naddress = \"{addr}\"\nfamily = \"{family}\"\n"
            );
            if let Some(tunnel) = tunnel {
                t += &format!("tunnel = \"{tunnel}\"\n");
            }
            t += "\n";
        }
        std::fs::write(self.workdir.join("discovery.toml"), t).unwrap();
    }

    /// The identity the harness's template gives a family.
    pub fn identity(&self, family: &str) -> String {
        let td = &self.instances[0]
            .mesh
            .as_ref()
            .expect("enable_mesh first")
            .trust_domain;
        format!("spiffe://{td}/ecs/{CLUSTER}/{family}")
    }
}
