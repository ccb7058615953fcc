# frozen_string_literal: true

require_relative "../support/registry"

# oci_upper_size: each sandbox on a registry image may write that much on top of the
# shared read-only image root; a full disk is ENOSPC inside the guest.
RSpec.describe "writable space of sandboxes on registry images (oci_upper_size)" do
  before(:all) do
    @ref = MicrosandboxSpec::Registry.instance.push_dir("team/upper", "1.0", MicrosandboxSpec::Rootfs.busybox_dir,
                                                         env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
  end

  let(:opts) { { image: @ref, registry_insecure: true } }

  def root_size_kib(sb)
    sb.shell("df -k / | tail -n 1").stdout.split[1].to_i
  end

  it "gives 4 GiB by default" do
    Microsandbox::Sandbox.create(unique_name("upper-def"), **opts) do |sb|
      expect(root_size_kib(sb)).to be_between(3_900_000, 4_300_000)
      expect(sb.shell("dd if=/dev/zero of=/root/f bs=1M count=100 2>&1").exit_code).to eq(0)
    end
  end

  it "turns a full disk into ENOSPC in the guest, keeps the sandbox usable and the host file bounded" do
    name = unique_name("upper-64")
    Microsandbox::Sandbox.create(name, oci_upper_size: 64, **opts) do |sb|
      expect(root_size_kib(sb)).to be_between(55_000, 75_000)
      full = sb.shell("dd if=/dev/zero of=/root/big bs=1M count=100 2>&1")
      expect(full.exit_code).not_to eq(0)
      expect(full.stdout).to include("No space left on device")
      sb.shell("sync")
      expect(sb.exec("dd", ["if=/dev/zero", "of=/root/more", "bs=1M", "count=1"]).success?).to be(false)
      expect(sb.exec("echo", ["still fine"]).stdout).to eq("still fine\n")
      expect(File.size(File.join(sandbox_dir(name), "root.qcow2"))).to be < 90 << 20
      sb.shell("rm /root/big /root/more; sync")
      expect(sb.shell("dd if=/dev/zero of=/root/ok bs=1M count=10 2>&1").exit_code).to eq(0)
    end
    # Grown once: a restart finds the same size (the growth lives in the overlay).
    Microsandbox::Sandbox.start(name) { |sb| expect(root_size_kib(sb)).to be_between(55_000, 75_000) }
  end

  it "rejects invalid sizes before starting anything" do
    name = unique_name("upper-bad")
    [0, -64, 1 << 21].each do |bad|
      expect { Microsandbox::Sandbox.create(name, oci_upper_size: bad, **opts) }
        .to raise_error(Microsandbox::InvalidConfigError, /oci_upper_size/)
    end
    expect { Microsandbox::Sandbox.create(name, oci_upper_size: "64M", **opts) }.to raise_error(TypeError, /Integer/)
    expect(Microsandbox::Sandbox.list.map(&:name)).not_to include(name)
    expect(File.exist?(sandbox_dir(name))).to be(false)
  end
end
