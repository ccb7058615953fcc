# frozen_string_literal: true

require "digest"
require "fileutils"
require "resolv"
require "timeout"
require "tmpdir"

module MicrosandboxSpec
  # The test suite's "internet": a network namespace joined to the host by a veth pair,
  # holding documentation addresses (RFC 5737) and serving
  #
  #   203.0.113.10  HTTP :80 (/hello, /big = 64 MiB), TCP echo :7, UDP echo :7
  #   203.0.113.53  DNS :53 (dnsmasq-base), answering only the names in {NAMES}
  #   2001:db8:6d73::10, ::11  HTTP :80, TCP echo :7, UDP echo :7 (IPv6, RFC 3849)
  #
  # The host reaches it through 198.51.100.1 (its end of the veth; the namespace end is
  # 198.51.100.2) and a route for {ROUTE}; over IPv6 through {NET6} on the veth
  # (2001:db8:6d73::1 on the host end, ::2 and the servers on the namespace end: one /64
  # of documentation space, nothing wider). {UNREACHABLE6} gets an `unreachable` route on
  # the host (a destination the host has no route to, without sending anything anywhere —
  # this host has a real IPv6 default route). Nothing in it forwards anywhere else.
  #
  # Needs root (`ip netns`, veth). Without it {start!} raises with a clear message — a
  # spec that needs the internet fails, it is never skipped silently. Started once per
  # process on first use, removed at exit (also after a failure or Ctrl-C); namespaces
  # left by a run that was killed are removed by the next one.
  module NetNS
    HOST_ADDR = "198.51.100.1"
    PEER_ADDR = "198.51.100.2"
    WEB = "203.0.113.10"
    DNS = "203.0.113.53"
    # Only the lower quarter of 203.0.113.0/24 is routed into the namespace: build machines
    # may reach their package mirrors through a documentation address too (this one's is in
    # the upper half), and a /24 route would send apt, cargo and pip there while a spec runs.
    ROUTE = "203.0.113.0/26"
    NET6 = "2001:db8:6d73::/64"
    HOST_ADDR6 = "2001:db8:6d73::1"
    PEER_ADDR6 = "2001:db8:6d73::2"
    WEB6 = "2001:db8:6d73::10"
    WEB6_OTHER = "2001:db8:6d73::11"
    UNREACHABLE6 = "2001:db8:6d73:ffff::/64"
    # IPv6-only names (AAAA records) for the IPv6 specs.
    NAMES6 = { "inet6.test" => WEB6_OTHER, "rebind6.test" => "fd00::1", "local6.test" => "::1" }.freeze
    # Names the DNS server answers, and their addresses (for rebind and CNAME tests).
    NAMES = {
      "inet.test" => WEB,
      "other.inet.test" => "203.0.113.11",
      "rebind.test" => "10.0.0.1",
      "local.test" => "127.0.0.1",
      "meta.test" => "169.254.169.254"
    }.freeze
    CNAMES = { "alias.inet.test" => "inet.test" }.freeze
    BIG_SIZE = 64 * 1024 * 1024
    PREFIX = "msbtest"

    class << self
      attr_reader :big_sha256

      # Runs the block with net.ipv4.ping_group_range set to `value` ("0 0": root's group
      # may open unprivileged ping sockets, IPv4 and IPv6 alike; "1 0": nobody may), then
      # puts the old value back. The sysctl is per network namespace and this is the
      # host's, so a spec holds it only as long as it needs.
      def with_ping_group_range(value)
        path = "/proc/sys/net/ipv4/ping_group_range"
        old = File.read(path).split.join(" ")
        File.write(path, value)
        yield
      ensure
        File.write(path, old) if old
      end

      # Starts the namespace and its services (once per process). Raises when not root or
      # when something fails to come up (everything created so far is removed).
      def start!
        return self if @started

        unless Process.uid.zero?
          raise "the test internet (spec/support/netns.rb) needs root: it creates a network " \
                "namespace and a veth pair. Run the network specs as root (CI does)."
        end
        %w[ip dnsmasq].each do |tool|
          next if system("command -v #{tool} >/dev/null 2>&1") || File.executable?("/usr/sbin/#{tool}")

          raise "the test internet needs `#{tool}` (Debian packages iproute2, dnsmasq-base; run bin/setup)"
        end
        take_lock
        remove_stale
        @name = "#{PREFIX}-#{Process.pid}"
        @veth = "msb#{Process.pid.to_s(36)}"[0, 12]
        @dir = Dir.mktmpdir("msb-netns")
        at_exit { stop! }
        begin
          build
          @started = true
        rescue StandardError
          stop!
          raise
        end
        self
      end

      # The namespace's name (for `ip netns exec`).
      def name
        start!
        @name
      end

      # Removes the namespace, its veth, route and processes. Idempotent.
      def stop!
        (@pids || []).each do |pid|
          Process.kill("TERM", pid)
          Timeout.timeout(5) { Process.wait(pid) }
        rescue Errno::ESRCH, Errno::ECHILD
          nil
        rescue Timeout::Error
          Process.kill("KILL", pid)
          Process.wait(pid)
        end
        @pids = []
        if @name
          sh("ip", "route", "del", ROUTE, "via", PEER_ADDR, allow_fail: true)
          sh("ip", "-6", "route", "del", "unreachable", UNREACHABLE6, allow_fail: true)
          sh("ip", "link", "del", "#{@veth}h", allow_fail: true)
          sh("ip", "netns", "del", @name, allow_fail: true)
        end
        FileUtils.rm_rf(@dir) if @dir
        @lock&.close
        @lock = nil
        @started = false
        @name = nil
        @dir = nil
      end

      private

      LOCK = "/run/lock/microsandbox-test-internet.lock"
      LOCK_WAIT = 1800

      # One test internet per machine (the addresses and the route are global): another
      # suite that has one (another checkout, CI) is waited for, at most 30 minutes.
      def take_lock
        FileUtils.mkdir_p(File.dirname(LOCK))
        @lock = File.open(LOCK, File::RDWR | File::CREAT, 0o600)
        deadline = Time.now + LOCK_WAIT
        until @lock.flock(File::LOCK_EX | File::LOCK_NB)
          raise "another test run holds the test internet (#{LOCK}) for more than #{LOCK_WAIT} s" if Time.now > deadline

          sleep 1
        end
      end

      def build
        sh("ip", "netns", "add", @name)
        sh("ip", "link", "add", "#{@veth}h", "type", "veth", "peer", "name", "#{@veth}n")
        sh("ip", "link", "set", "#{@veth}n", "netns", @name)
        sh("ip", "addr", "add", "#{HOST_ADDR}/24", "dev", "#{@veth}h")
        sh("ip", "link", "set", "#{@veth}h", "up")
        ns("ip", "link", "set", "lo", "up")
        ns("ip", "addr", "add", "#{PEER_ADDR}/24", "dev", "#{@veth}n")
        [WEB, "203.0.113.11", DNS].each { |a| ns("ip", "addr", "add", "#{a}/32", "dev", "#{@veth}n") }
        ns("ip", "link", "set", "#{@veth}n", "up")
        sh("ip", "route", "add", ROUTE, "via", PEER_ADDR)
        # IPv6: addresses without duplicate address detection (usable at once); the /64 is
        # the veth's connected route, so nothing else is routed into the namespace.
        sh("ip", "-6", "addr", "add", "#{HOST_ADDR6}/64", "dev", "#{@veth}h", "nodad")
        ns("ip", "-6", "addr", "add", "#{PEER_ADDR6}/64", "dev", "#{@veth}n", "nodad")
        [WEB6, WEB6_OTHER].each { |a| ns("ip", "-6", "addr", "add", "#{a}/128", "dev", "#{@veth}n", "nodad") }
        sh("ip", "-6", "route", "replace", "unreachable", UNREACHABLE6)

        big = File.join(@dir, "big.bin")
        File.open(big, "wb") do |f|
          rng = Random.new(20_260_914)
          (BIG_SIZE / (1 << 20)).times { f.write(rng.bytes(1 << 20)) }
        end
        @big_sha256 = Digest::SHA256.file(big).hexdigest
        @pids = []
        start_servers(big)
        start_dns
        wait_until_serving
      end

      def start_servers(big)
        script = File.expand_path("netns_servers.rb", __dir__)
        r, w = IO.pipe
        @pids << Process.spawn("ip", "netns", "exec", @name, RbConfig.ruby, script, big, out: w, err: File::NULL)
        w.close
        line = Timeout.timeout(20) { r.gets }
        r.close
        raise "the test internet's servers did not start" unless line&.start_with?("ready")
      end

      def start_dns
        args = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--pid-file=",
                "--user=root", "--listen-address=#{DNS}", "--bind-interfaces", "--port=53", "--log-facility=-",
                "--conf-file=/dev/null"]
        NAMES.merge(NAMES6).each { |n, a| args << "--host-record=#{n},#{a}" }
        CNAMES.each { |n, t| args << "--cname=#{n},#{t}" }
        @pids << Process.spawn("ip", "netns", "exec", @name, *args, out: File::NULL, err: File::NULL)
      end

      def wait_until_serving
        deadline = Time.now + 20
        loop do
          ok = begin
            Resolv::DNS.open(nameserver_port: [[DNS, 53]]) do |dns|
              dns.timeouts = 1
              dns.getaddress("inet.test").to_s == WEB
            end
          rescue Resolv::ResolvError, SystemCallError
            false
          end
          return if ok
          raise "the test internet's DNS server did not answer within 20 s" if Time.now > deadline

          sleep 0.2
        end
      end

      def ns(*cmd)
        sh("ip", "netns", "exec", @name, *cmd)
      end

      def sh(*cmd, allow_fail: false)
        ok = system(*cmd, out: File::NULL, err: File::NULL)
        raise "test internet: `#{cmd.join(" ")}` failed" unless ok || allow_fail

        ok
      end

      # Namespaces of earlier runs whose process is gone (killed before its at_exit).
      def remove_stale
        `ip netns list 2>/dev/null`.lines.map { |l| l.split.first }.compact.each do |ns_name|
          next unless (m = ns_name.match(/\A#{PREFIX}-(\d+)\z/))

          pid = m[1].to_i
          alive = begin
            Process.kill(0, pid)
            true
          rescue Errno::ESRCH
            false
          rescue Errno::EPERM
            true
          end
          next if alive

          system("ip", "netns", "pids", ns_name, out: File::NULL) # informational only
          `ip netns pids #{ns_name} 2>/dev/null`.split.each do |p|
            Process.kill("KILL", p.to_i)
          rescue Errno::ESRCH
            nil
          end
          system("ip", "netns", "del", ns_name, out: File::NULL, err: File::NULL)
          system("ip", "route", "del", ROUTE, "via", PEER_ADDR, out: File::NULL, err: File::NULL)
        end
        # Earlier versions routed the whole /24; a killed run of one could leave that behind.
        system("ip", "route", "del", "203.0.113.0/24", "via", PEER_ADDR, out: File::NULL, err: File::NULL)
        system("ip", "-6", "route", "del", "unreachable", UNREACHABLE6, out: File::NULL, err: File::NULL)
      end
    end
  end
end
