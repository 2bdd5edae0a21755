"""ipfilter backend family (AIX, Solaris, illumos): ipf.conf/ippool renderer and swap runner."""
