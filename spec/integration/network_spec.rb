# frozen_string_literal: true

# Guest networking against real VMs. Test traffic stays on loopback (inside the guest, or
# the host's 127.0.0.1 reached through the sandbox's gateway).
RSpec.describe "Guest networking" do
  describe "loopback inside the guest" do
    before(:all) { @sb = Microsandbox::Sandbox.create(unique_name("net-lo"), image: rootfs) }
    after(:all) { @sb&.kill }

    it "brings up lo, so a server and a client on 127.0.0.1 in one sandbox talk" do
      out = @sb.shell(<<~SH, timeout: 60)
        ip link show lo | grep -q 'UP' || { echo lo-down; exit 1; }
        echo ping-from-server | nc -l -p 7000 > /tmp/got &
        for i in $(seq 1 50); do netstat -ltn | grep -q ':7000 ' && break; sleep 0.1; done
        echo hello-from-client | nc 127.0.0.1 7000
        wait
        cat /tmp/got
      SH
      expect(out.stderr).to eq("")
      expect(out.stdout).to eq("ping-from-server\nhello-from-client\n")
      expect(out.exit_code).to eq(0)
    end
  end
end
